-- Orthanc routing for discgeo: send every stable MR study to the discgeo gateway (DICOM modality
-- "discgeo"), unless it already holds discgeo's own results (the SEG and SR sent back by the gateway
-- make the study stable again; sending it twice would be ignored by the gateway anyway).
function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local hasMR = false
  for _, s in ipairs(series) do
    local modality = s['MainDicomTags']['Modality']
    local description = s['MainDicomTags']['SeriesDescription'] or ''
    if modality == 'MR' then
      hasMR = true
    end
    if (modality == 'SEG' or modality == 'SR') and string.find(description, 'discgeo', 1, true) then
      return
    end
  end
  if hasMR then
    print('discgeo: routing stable study ' .. studyId .. ' to the gateway')
    RestApiPost('/modalities/discgeo/store', studyId)
  end
end
